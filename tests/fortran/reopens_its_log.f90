! reopens_its_log.f90: a port that opens its log at every start, after
! cryo_init, as most Fortran codes do, for tests/tests/fortran.rs.
!
! `reopens_its_log STEPS MODE` writes "rank R step S" per step to log.R,
! opened with status='replace' (MODE "replace"), with status='unknown',
! position='append' (MODE "append"), or with neither, as most codes open a
! file (MODE "asis"). In every mode a restart goes on from the checkpoint:
! cryo keeps the OPEN from emptying the file it gave back and moves the unit
! to where the file stood. Linked with libgfortran before the runtime, the
! restart's "asis" unit starts at the top, its first WRITE cuts the file
! there, and cryo names it.
program reopens_its_log
  use, intrinsic :: iso_fortran_env, only: int64
  use mpi
  use cryo
  implicit none
  integer :: ierr, me, u, rc
  integer(int64), pointer :: step(:)
  character(len=64) :: arg, mode, name
  integer(int64) :: steps
  double precision :: t0

  call get_command_argument(1, arg)
  read (arg, *) steps
  call get_command_argument(2, mode)
  call MPI_Init(ierr)
  call MPI_Comm_rank(MPI_COMM_WORLD, me, ierr)
  call cryo_init_mpi(MPI_COMM_WORLD)
  call cryo_region_int64('step', step, [1])
  write (name, '(a,i0)') 'log.', me
  if (mode == 'replace') then
    open (newunit=u, file=trim(name), status='replace', action='write')
  else if (mode == 'asis') then
    open (newunit=u, file=trim(name))
  else
    open (newunit=u, file=trim(name), status='unknown', position='append', action='write')
  end if
  do while (step(1) < steps)
    write (u, '(a,i0,a,i0)') 'rank ', me, ' step ', step(1)
    flush (u)
    t0 = MPI_Wtime()
    do while (MPI_Wtime() - t0 < 0.05d0)
    end do
    call MPI_Barrier(MPI_COMM_WORLD, ierr)
    step(1) = step(1) + 1
    rc = cryo_checkpoint_point()
  end do
  close (u)
  call cryo_finalize()
  call MPI_Finalize(ierr)
end program reopens_its_log
