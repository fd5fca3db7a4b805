! fortran_unit.f90: the state suite's Fortran shape. Each rank logs every
! step through a formatted Fortran unit, which gfortran's runtime buffers:
! the lines still in the unit's buffer at a checkpoint must reach the file
! before cryo records its size (the runtime flushes every unit on the
! checkpoint path), or a restart loses them.
!
! The same protocol as harness.c: `--dir OUTDIR --iters K --step-ms MS`;
! rank 0 prints "step N", "checkpointed after step N", "resumed after step
! N from epoch E" and "OK"; every rank writes fortran.<rank>.out (its log)
! and summary.<rank>.out (what every rank saw of the job).
!
! On a restart the unit is connected again to the restored fd through
! /proc/self/fd/<fd> with position='append': cryo cut the file back to its
! size at the checkpoint, so appending goes on exactly where it stood.
!
! Each rank also keeps a second log, reopened.<rank>.out, that it opens
! with position='append', writes and closes at every step, as many Fortran
! codes do: no unit is connected to it at a checkpoint, and a restart must
! cut it back to its size then (checked right after the restart against
! the size kept in the state region), or the steps run again log twice.
!
! cryo's C API through iso_c_binding; cryo_init_mpi takes MPICH's integer
! communicator handle, which is the same in C and Fortran.
!
! Build: mpif90 -O2 fortran_unit.f90 -L DIR -lcryo_rank -Wl,-rpath,DIR
module cryo_api
  use iso_c_binding
  implicit none
  interface
    integer(c_int) function cryo_init_mpi(comm) bind(C, name='cryo_init_mpi')
      import :: c_int
      integer(c_int), value :: comm
    end function
    integer(c_int) function cryo_region(name, len, out) bind(C, name='cryo_region')
      import :: c_int, c_char, c_size_t, c_ptr
      character(kind=c_char), dimension(*), intent(in) :: name
      integer(c_size_t), value :: len
      type(c_ptr), intent(out) :: out
    end function
    integer(c_int) function cryo_checkpoint_point() bind(C, name='cryo_checkpoint_point')
      import :: c_int
    end function
    integer(c_int64_t) function cryo_restored_epoch() bind(C, name='cryo_restored_epoch')
      import :: c_int64_t
    end function
    integer(c_int) function cryo_finalize() bind(C, name='cryo_finalize')
      import :: c_int
    end function
    integer(c_int) function c_usleep(us) bind(C, name='usleep')
      import :: c_int
      integer(c_int), value :: us
    end function
  end interface
end module cryo_api

program fortran_unit
  use mpi
  use cryo_api
  implicit none
  integer(c_int64_t), parameter :: magic = int(z'43525946', c_int64_t)
  integer(c_int64_t), pointer :: st(:)
  type(c_ptr) :: region
  character(len=4096) :: dir, arg, path
  character(len=4096) :: reopened
  integer :: iters, step_ms, rank, nranks, ierr, u, i, rc, r
  integer(c_int64_t) :: now_bytes
  integer(c_int64_t) :: epoch, local, total, mix
  real(8) :: x

  dir = ''
  iters = 0
  step_ms = 0
  i = 1
  do while (i < command_argument_count())
    call get_command_argument(i, arg)
    select case (trim(arg))
    case ('--dir')
      call get_command_argument(i + 1, dir)
    case ('--iters')
      call get_command_argument(i + 1, arg)
      read (arg, *) iters
    case ('--step-ms')
      call get_command_argument(i + 1, arg)
      read (arg, *) step_ms
    case default
      write (0, '(a)') 'usage: fortran_unit --dir OUTDIR --iters K [--step-ms MS]'
      stop 2
    end select
    i = i + 2
  end do
  if (len_trim(dir) == 0 .or. iters <= 0) stop 2

  call MPI_Init(ierr)
  call MPI_Comm_rank(MPI_COMM_WORLD, rank, ierr)
  call MPI_Comm_size(MPI_COMM_WORLD, nranks, ierr)
  rc = cryo_init_mpi(int(MPI_COMM_WORLD, c_int))
  if (rc /= 0) call fail('cryo_init_mpi failed')
  epoch = cryo_restored_epoch()
  rc = cryo_region('state'//c_null_char, 4096_c_size_t, region)
  if (rc /= 0) call fail('cryo_region failed')
  ! st(1) magic, st(2) steps done, st(3) the log's fd, st(4) the running mix,
  ! st(5) the reopened log's size after the last step
  call c_f_pointer(region, st, [512])

  write (path, '(a,a,i0,a)') trim(dir), '/fortran.', rank, '.out'
  write (reopened, '(a,a,i0,a)') trim(dir), '/reopened.', rank, '.out'
  if (epoch == 0) then
    if (st(1) /= 0) call fail('fresh start, but the state region is not zero')
    call execute_command_line('mkdir -p '//trim(dir))
    open (newunit=u, file=trim(path), action='write', status='replace', form='formatted')
    st(3) = fnum(u)
    open (newunit=r, file=trim(reopened), action='write', status='replace', form='formatted')
    close (r)
    st(1) = magic
  else
    if (st(1) /= magic) call fail('restarted, but the state region was not restored')
    inquire (file=trim(reopened), size=now_bytes)
    if (now_bytes /= st(5)) call fail('after the restart the reopened log is not back at its size')
    ! The fd came back at its number, offset and size; connect a unit to it.
    write (arg, '(a,i0)') '/proc/self/fd/', st(3)
    open (newunit=u, file=trim(arg), action='write', status='old', position='append', &
          form='formatted')
    if (rank == 0) then
      write (*, '(a,i0,a,i0)') 'resumed after step ', st(2), ' from epoch ', epoch
      flush (6)
    end if
  end if

  do while (st(2) < iters)
    x = sin(real(st(2), 8) * 0.1d0 + real(rank, 8))
    ! Several lines a step, well under the unit's buffer: they sit there.
    do i = 1, 3
      write (u, '(a,i0,a,i0,a,i0,a,f12.8)') 'rank ', rank, ' step ', st(2) + 1, ' line ', i, &
        ' value ', x * i
    end do
    open (newunit=r, file=trim(reopened), action='write', status='old', position='append', &
          form='formatted')
    write (r, '(a,i0,a,i0,a,f14.10)') 'reopened rank ', rank, ' step ', st(2) + 1, ' value ', x
    close (r)
    inquire (file=trim(reopened), size=now_bytes)
    st(5) = now_bytes
    local = st(2) * 31 + rank
    call MPI_Allreduce(local, total, 1, MPI_INTEGER8, MPI_SUM, MPI_COMM_WORLD, ierr)
    st(4) = ieor(ishftc(st(4), 13), total)
    st(2) = st(2) + 1
    if (rank == 0) then
      write (*, '(a,i0)') 'step ', st(2)
      flush (6)
    end if
    rc = cryo_checkpoint_point()
    if (rc < 0) call fail('cryo_checkpoint_point failed')
    if (rc == 1 .and. rank == 0) then
      write (*, '(a,i0)') 'checkpointed after step ', st(2)
      flush (6)
    end if
    if (step_ms > 0) call sleep_ms(step_ms)
  end do
  close (u)

  mix = st(4)
  write (path, '(a,a,i0,a)') trim(dir), '/summary.', rank, '.out'
  open (newunit=u, file=trim(path), action='write', status='replace')
  write (u, '(a,i0,a,i0,a,i0)') 'fortran_unit: ', st(2), ' steps on ', nranks, ' ranks, mix ', mix
  close (u)
  call MPI_Barrier(MPI_COMM_WORLD, ierr)
  if (rank == 0) then
    write (*, '(a)') 'OK'
    flush (6)
  end if
  rc = cryo_finalize()
  call MPI_Finalize(ierr)

contains

  subroutine fail(what)
    character(len=*), intent(in) :: what
    write (0, '(a,i0,a,a)') 'state[fortran_unit] rank ', rank, ': FAILED: ', what
    call MPI_Abort(MPI_COMM_WORLD, 1, ierr)
    stop 1
  end subroutine

  subroutine sleep_ms(ms)
    integer, intent(in) :: ms
    integer :: ignored
    ignored = c_usleep(int(ms * 1000, c_int))
  end subroutine

end program fortran_unit
