! typed_regions.f90: drives the cryo Fortran module's typed regions and
! cryo_protect on one rank without an agent, through `use mpi` (integer
! communicator handles), for tests/tests/fortran.rs to judge.
!
! `typed_regions DIR` prints one line per case, `NAME: CODE MESSAGE` for
! the calls that must fail and `NAME: ...` with shapes and bounds for those
! that must work, and writes the raw bytes of a 3-D int64 region to
! DIR/cube.bin so the test can read them back in C order. It stops with an
! error only when a call that must work fails. `typed_regions DIR stop`
! instead makes one bad call without `ierr`, which must stop the program
! with the message.
program typed_regions
  use, intrinsic :: iso_c_binding, only: c_f_pointer, c_loc, c_null_char, c_ptr
  use, intrinsic :: iso_fortran_env, only: int8, int32, int64, real32, real64, output_unit
  use mpi
  use cryo
  implicit none
  integer, parameter :: NX = 3, NY = 4, NZ = 5
  character(len=4096) :: dir, mode
  integer :: ierr, i, j, k, u
  integer(int64), pointer :: cube(:, :, :), none(:)
  integer(int8), pointer :: bytes(:)
  real(real64), pointer :: r64_1(:), r64_2(:, :), r64_3(:, :, :), mapped(:, :)
  real(real32), pointer :: r32_1(:), r32_2(:, :), r32_3(:, :, :)
  integer(int32), pointer :: i32_1(:), i32_2(:, :), i32_3(:, :, :)
  integer(int64), pointer :: i64_1(:), i64_2(:, :)
  integer(int64), allocatable, target :: table(:, :)
  type(c_ptr) :: raw

  call get_command_argument(1, dir)
  call get_command_argument(2, mode)
  call MPI_Init(ierr)
  if (mode == 'stop') then
    call cryo_init_mpi(MPI_COMM_WORLD)
    call cryo_region_real64('two-by-three', r64_1, [2, 3])
    write (output_unit, '(a)') 'not stopped'
    call MPI_Finalize(ierr)
    stop
  end if

  call cryo_region_int64('early', none, [1], ierr)
  call say('before-init', ierr)
  call cryo_init_mpi(MPI_COMM_NULL, ierr)
  call say('null-comm', ierr)
  call cryo_init_mpi(MPI_COMM_WORLD)

  ! Fortran order: cube(i, j, k) is element (i-1) + NX*(j-1) + NX*NY*(k-1).
  call cryo_region_int64('cube', cube, [NX, NY, NZ])
  do k = 1, NZ
    do j = 1, NY
      do i = 1, NX
        cube(i, j, k) = i + 10 * j + 100 * k
      end do
    end do
  end do
  call bounds('cube', shape(cube), lbound(cube), ubound(cube))
  call c_f_pointer(c_loc(cube), bytes, [NX * NY * NZ * 8])
  open (newunit=u, file=trim(dir)//'/cube.bin', access='stream', form='unformatted', &
        action='write', status='replace')
  write (u) bytes
  close (u)

  ! Every other type and rank; each array fills its region to the byte.
  call cryo_region_real64('r64-1', r64_1, [512])
  r64_1 = 1.5_real64
  call bounds('r64-1', shape(r64_1), lbound(r64_1), ubound(r64_1))
  call cryo_region_real64('r64-2', r64_2, [8, 64])
  r64_2 = 2.5_real64
  call bounds('r64-2', shape(r64_2), lbound(r64_2), ubound(r64_2))
  call cryo_region_real64('r64-3', r64_3, [2, 4, 64])
  r64_3 = 3.5_real64
  call bounds('r64-3', shape(r64_3), lbound(r64_3), ubound(r64_3))
  call cryo_region_real32('r32-1', r32_1, [1024])
  r32_1 = 1.5
  call bounds('r32-1', shape(r32_1), lbound(r32_1), ubound(r32_1))
  call cryo_region_real32('r32-2', r32_2, [32, 32])
  r32_2 = 2.5
  call bounds('r32-2', shape(r32_2), lbound(r32_2), ubound(r32_2))
  call cryo_region_real32('r32-3', r32_3, [4, 16, 16])
  r32_3 = 3.5
  call bounds('r32-3', shape(r32_3), lbound(r32_3), ubound(r32_3))
  call cryo_region_int32('i32-1', i32_1, [1024])
  i32_1 = 1
  call bounds('i32-1', shape(i32_1), lbound(i32_1), ubound(i32_1))
  call cryo_region_int32('i32-2', i32_2, [16, 64])
  i32_2 = 2
  call bounds('i32-2', shape(i32_2), lbound(i32_2), ubound(i32_2))
  call cryo_region_int32('i32-3', i32_3, [16, 16, 4])
  i32_3 = 3
  call bounds('i32-3', shape(i32_3), lbound(i32_3), ubound(i32_3))
  call cryo_region_int64('i64-1', i64_1, [512])
  i64_1 = 1
  call bounds('i64-1', shape(i64_1), lbound(i64_1), ubound(i64_1))
  call cryo_region_int64('i64-2', i64_2, [64, 8])
  i64_2 = 2
  call bounds('i64-2', shape(i64_2), lbound(i64_2), ubound(i64_2))
  write (output_unit, '(a,*(1x,i0))') 'sums:', nint(sum(r64_1)), nint(sum(r64_2)), &
    nint(sum(r64_3)), nint(sum(r32_1)), nint(sum(r32_2)), nint(sum(r32_3)), sum(i32_1), &
    sum(i32_2), sum(i32_3), sum(i64_1), sum(i64_2)

  ! A private file region seen as a 2-D real64 array: the file holds 0..511.
  open (newunit=u, file=trim(dir)//'/field.bin', access='stream', form='unformatted', &
        action='write', status='replace')
  write (u) [(real(i, real64), i = 0, 511)]
  close (u)
  call cryo_region_real64('field', mapped, [16, 32], file=trim(dir)//'/field.bin')
  write (output_unit, '(a,*(1x,i0))') 'field:', nint(mapped(1, 1)), nint(mapped(16, 1)), &
    nint(mapped(1, 2)), nint(mapped(16, 32))

  ! An allocatable array the program already has, lower bounds 0 and 1.
  allocate (table(0:4, 3))
  table = 7
  call cryo_protect('table', table, ierr)
  call say('protect-table', ierr)
  call cryo_protect('strided', table(0:4:2, :), ierr)
  call say('protect-strided', ierr)
  call cryo_protect('table', table, ierr)
  call say('protect-twice', ierr)

  call cryo_region_real64('extents', r64_1, [2, 3], ierr)
  call say('extents-for-rank', ierr)
  call cryo_region_int32('zero', i32_2, [4, 0], ierr)
  call say('zero-extent', ierr)
  call cryo_region_real32('negative', r32_3, [4, -2, 1], ierr)
  call say('negative-extent', ierr)
  call cryo_region_int64('nul'//c_null_char//'name', i64_1, [8], ierr)
  call say('nul-in-name', ierr)
  call cryo_region_real64('cube', r64_1, [8], ierr)
  call say('duplicate-name', ierr)
  call cryo_region_real64('short-file', mapped, [16, 33], ierr, file=trim(dir)//'/field.bin')
  call say('file-too-short', ierr)
  call cryo_region('bytes', -1_int64, raw, ierr)
  call say('negative-bytes', ierr)

  write (output_unit, '(a,1x,i0,1x,i0)') 'safe-point:', cryo_checkpoint_point(), &
    cryo_restored_epoch()
  call cryo_finalize()
  call MPI_Finalize(ierr)

contains

  subroutine say(name, code)
    character(len=*), intent(in) :: name
    integer, intent(in) :: code
    write (output_unit, '(a,a,i0,1x,a)') name, ': ', code, cryo_strerror(code)
  end subroutine

  subroutine bounds(name, extents, lower, upper)
    character(len=*), intent(in) :: name
    integer, intent(in) :: extents(:), lower(:), upper(:)
    write (output_unit, '(a,a,*(1x,i0))') name, ': shape', extents
    write (output_unit, '(a,a,*(1x,i0))') name, ': lbound', lower
    write (output_unit, '(a,a,*(1x,i0))') name, ': ubound', upper
  end subroutine

end program typed_regions
